"""Training and benchmark data: label-map synthesis, random-shape pairs, volume datasets.

Submodules are imported on demand (``from dinoreg.data import synthesis``) so that
importing the package stays cheap.
"""
