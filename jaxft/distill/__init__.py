"""Knowledge distillation (stage `distill`, docs/distill.md).

  losses.py   KD / cosine / hidden-state / attention terms, per row, fp32
  task.py     the classification and MLM distillation Tasks (teacher via the step's `extra`)
  teacher.py  teacher loading and checks, the teacher-logits cache
  init.py     student init: every k-th teacher layer (DistilBERT)
  stage.py    the stage: data, teacher on the mesh, student, loop.train, results
"""
