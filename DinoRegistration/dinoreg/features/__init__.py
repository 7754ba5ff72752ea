"""Feature backends: handcrafted MIND-SSC and frozen DINOv2/DINOv3 slice-wise features."""
