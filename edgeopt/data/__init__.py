"""Data: the bundled digits and users' ImageFolder trees, decoded once into a Dataset artifact (``sources``), and
the one image decoder that training and serving share (``images``).
"""
