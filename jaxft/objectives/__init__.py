"""Objectives: how a batch becomes a loss and eval outputs (`jaxft.train.step.Objective`).

  lm              masked LM (dynamic masking in the step), causal LM; eval summary
  classification  sequence classification / regression and token classification (NER)
  outputs         a model's per-example outputs (inference: predict, teacher logits)
  distill         knowledge-distillation losses and objectives (teacher as a step constant)
  cloze           PET-style cloze classification with the MLM head
  completion      LM fine-tuning on (prompt, completion) rows; decoding inside the eval step
"""
