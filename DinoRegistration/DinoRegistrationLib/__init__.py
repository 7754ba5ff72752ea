"""Slicer side of DinoRegistration: everything between the panel and the engine, GUI-free.

- ``process``: a background command whose output is polled from the main thread;
- ``job``: one registration running in the background (options, result, errors);
- ``logic``: scene <-> engine (export inputs, load results, comparison views, landmark check);
- ``scene``: results as MRML nodes (shared with ``dinoreg register --scene``);
- ``landmarks``: markups point lists -> distances before and after registration;
- ``install``: the engine's packages in Slicer's Python;
- ``parameters``: the panel's parameter node declarations.

Uses Slicer's MRML (inside Slicer or headless with ``slicer-core``), never Qt: the module file
``DinoRegistration.py`` holds the panel. The engine (``dinoreg``) is only run as a
separate process, except its light modules (progress protocol, requirements, landmark maths).
"""
