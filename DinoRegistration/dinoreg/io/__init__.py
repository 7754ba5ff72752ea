"""Files a user hands us or gets back: volumes, landmarks, the names of a registration's output files."""
