"""face-train: the trainable models of the original design (YOLO face detector,
Wing-loss landmark regressor, ArcFace embedder), trained on a gallery of labels."""
