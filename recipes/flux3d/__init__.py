"""FLUX3D: image-to-3D Gaussian Splatting assembled from sparse3d blocks."""
