"""Knowledge distillation's parts beside its objective (jaxft.objectives.distill) and stage
(jaxft.stages.distill):

  teacher.py  teacher loading and checks (head, labels), the teacher-logits cache
  student.py  the student model (+ projection), init from every k-th teacher layer, speed
"""
