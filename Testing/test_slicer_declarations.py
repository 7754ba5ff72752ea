"""The panel's declarations checked against the rules of Slicer's parameter-node GUI connectors.

Slicer binds each widget that has a ``SlicerParameterName`` property in the ``.ui`` file to the parameter
node field of that name, through the first connector whose ``canRepresent(widget, type)`` accepts the pair
(Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, tags v5.6.0, v5.8.1 and main). A pair no
connector accepts, or a connector's refusal (an unbounded float on a slider: "Cannot have a connection to
ctkSliderWidget where the float types is unbounded", v5.6.0 line 319), makes ``connectGui`` raise in
``setup()``: no widget is bound and the panel does not work. These rules are restated below and checked
against our ``.ui`` and ``DinoRegistrationLib.parameters``, so the next bad declaration fails here.
Also checked: every ``self.ui.NAME`` the panel uses exists in the ``.ui``, and the module file holds
only Module, Widget and Test, and never blocks the main thread.
"""

from __future__ import annotations

import ast
import enum
import pathlib
import sys
import typing
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' package is not slicer-core", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "DinoRegistration"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DinoRegistration.ui"
MODULE_FILE = MODULE_DIR / "DinoRegistration.py"
sys.path.insert(0, str(MODULE_DIR))

from DinoRegistrationLib import parameters  # noqa: E402

#: widget class -> kind of value Slicer's connectors bind it to (exact class: the connectors test type(widget) ==)
CONNECTOR_KINDS = {
    "QCheckBox": "bool", "QPushButton": "bool",
    "QSlider": "bounded int", "QSpinBox": "int",
    "QDoubleSpinBox": "float", "ctkSliderWidget": "bounded float", "qMRMLSliderWidget": "bounded float",
    "QComboBox": "choice", "QLineEdit": "str", "QTextEdit": "str",
    "ctkPathLineEdit": "path", "ctkDirectoryButton": "path", "qMRMLNodeComboBox": "node",
}


def ui_widgets() -> list[ElementTree.Element]:
    return list(ElementTree.parse(UI_FILE).getroot().iter("widget"))


def widget_property(widget: ElementTree.Element, name: str) -> ElementTree.Element | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop[0] if len(prop) else None
    return None


def bound_widgets() -> dict[str, ElementTree.Element]:
    bound = {}
    for widget in ui_widgets():
        prop = widget_property(widget, "SlicerParameterName")
        if prop is not None:
            assert prop.text not in bound, f"two widgets bound to '{prop.text}'"
            bound[prop.text] = widget
    return bound


def declarations() -> dict[str, typing.Any]:
    return typing.get_type_hints(parameters.DinoRegistrationParameterNode, include_extras=True)


def split(annotation: typing.Any) -> tuple[typing.Any, list]:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0], list(annotation.__metadata__)
    return annotation, []


def bounds(extras: list) -> tuple[float, float] | None:
    for extra in extras:
        if hasattr(extra, "minimum") and hasattr(extra, "maximum"):
            return extra.minimum, extra.maximum
    return None


def node_class_names(annotation: typing.Any) -> list[str] | None:
    """Class names of a node type or Union of node types (None allowed), as Slicer's getNodeTypes; else None."""
    base, _ = split(annotation)
    members = typing.get_args(base) if typing.get_origin(base) is typing.Union else (base,)
    names = []
    for member in members:
        if member is type(None):
            continue
        if not (isinstance(member, type) and issubclass(member, slicer.vtkMRMLNode)):
            return None
        names.append(member.__name__)
    return names


def connector_problem(widget_class: str, annotation: typing.Any, widget: ElementTree.Element) -> str:
    """Why Slicer's connectors would refuse this pair ('' if one accepts it), per guiConnectors.py."""
    kind = CONNECTOR_KINDS.get(widget_class)
    base, extras = split(annotation)
    if kind is None:
        return f"no GUI connector for widget class {widget_class}"
    if kind == "bool":
        if base is not bool:
            return f"{widget_class} binds only bool"
        if widget_class == "QPushButton":
            checkable = widget_property(widget, "checkable")
            if checkable is None or checkable.text != "true":
                return "a QPushButton bound to a bool must be checkable"
    elif kind in ("int", "bounded int", "float", "bounded float"):
        wanted = int if "int" in kind else float
        if base is not wanted:
            return f"{widget_class} binds {wanted.__name__}, not {base}"
        if bounds(extras) is None:  # sliders: refused; spin boxes: range set to +/- infinity (or int32)
            return f"{widget_class} bound to an unbounded {wanted.__name__}: add WithinRange(min, max)"
    elif kind == "choice":
        if not (isinstance(base, type) and issubclass(base, enum.Enum)) and not any(
                type(e).__name__ == "Choice" for e in extras):
            return "a QComboBox binds an Enum, or a value annotated with Choice"
    elif kind == "str":
        if base is not str:
            return f"{widget_class} binds str"
    elif kind == "path":
        if not (isinstance(base, type) and issubclass(base, pathlib.PurePath)):
            return f"{widget_class} binds pathlib.Path"
    elif kind == "node":
        names = node_class_names(annotation)
        if not names:
            return "qMRMLNodeComboBox binds a node type or a Union of node types"
        ui_types = widget_property(widget, "nodeTypes")
        listed = [s.text for s in ui_types] if ui_types is not None else []
        if listed != names:  # the connector overwrites nodeTypes: the .ui must say the same
            return f"nodeTypes {listed} in the .ui but {names} declared"
    return ""


def test_every_bound_widget_has_a_declared_field_that_a_connector_accepts():
    declared, bound = declarations(), bound_widgets()
    assert bound, "no widget is bound: connectGui would bind nothing"
    problems = []
    for name, widget in bound.items():
        if name not in declared:
            problems.append(f"{name}: bound in the .ui but not declared")
            continue
        problem = connector_problem(widget.get("class"), declared[name], widget)
        if problem:
            problems.append(f"{name} ({widget.get('class')}): {problem}")
    assert not problems, "\n".join(problems)


def test_the_rules_refuse_what_slicer_refuses():
    """The checker itself: the declarations of the old panel fail it, the template's pass."""
    slider = ElementTree.fromstring('<widget class="ctkSliderWidget" name="s"/>')
    spin = ElementTree.fromstring('<widget class="QDoubleSpinBox" name="d"/>')
    assert "unbounded" in connector_problem("ctkSliderWidget", float, slider)  # defect 1 (the blocker)
    assert "unbounded" in connector_problem("QDoubleSpinBox", float, spin)  # defect 2
    assert "unbounded" in connector_problem("QSpinBox", int, spin)
    assert connector_problem("ctkSliderWidget", typing.Annotated[float, parameters.WithinRange(-100, 500)], slider) == ""
    combo = ElementTree.fromstring('<widget class="QComboBox" name="c"/>')
    assert "Choice" in connector_problem("QComboBox", str, combo)
    assert "no GUI connector" in connector_problem("ctkCheckBox", bool, combo)


def test_spin_boxes_show_method_default_at_the_declared_minimum():
    """'method default' (specialValueText) shows only at the widget's minimum, which the connector sets from
    WithinRange: the declared default must be that minimum, and the .ui range the declared one."""
    declared = declarations()
    for name, widget in bound_widgets().items():
        special = widget_property(widget, "specialValueText")
        if special is None:
            continue
        limits = bounds(split(declared[name])[1])
        default = getattr(parameters.DinoRegistrationParameterNode, name)
        assert limits is not None and default == limits[0], name
        ui_min, ui_max = (float(widget_property(widget, key).text) for key in ("minimum", "maximum"))
        assert (ui_min, ui_max) == (float(limits[0]), float(limits[1])), name


def test_panel_code_uses_only_widgets_that_exist_in_the_ui():
    names = {w.get("name") for w in ui_widgets()}
    used = set()
    for node in ast.walk(ast.parse(MODULE_FILE.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui" \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            used.add(node.attr)
    assert used and not (used - names), f"used by the panel but missing in the .ui: {sorted(used - names)}"


def test_ui_uses_declared_custom_widgets_only():
    root = ElementTree.parse(UI_FILE).getroot()
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    for widget in ui_widgets():
        cls = widget.get("class")
        assert cls.startswith("Q") or cls in custom, f"{cls} is neither a Qt class nor a declared custom widget"


def test_module_file_holds_only_module_widget_and_test_and_never_waits():
    tree = ast.parse(MODULE_FILE.read_text())
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes == ["DinoRegistration", "DinoRegistrationWidget", "DinoRegistrationTest"]
    widget = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "DinoRegistrationWidget")
    blocking = []
    for node in ast.walk(widget):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("wait", "sleep", "communicate", "run", "check_output", "check_call"):
            blocking.append(f"line {node.lineno}: .{node.func.attr}(...)")
    assert not blocking, "the panel must poll from its timer, not wait: " + ", ".join(blocking)
