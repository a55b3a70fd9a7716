"""Training: the one loop for the teacher, the student and every KD fine-tune, with knowledge distillation
(``fit``), and the teacher a run compresses, trained or brought (``teacher``).
"""
