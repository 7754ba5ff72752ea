"""What a registration is judged by: metrics, the preview image, evaluation of finished registrations."""
