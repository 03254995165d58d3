"""Logit distillation: the tiny baseline as a student of a larger teacher export.

Changes: train.distill.teacher = <export> (required; same tokenizer), alpha 0.5,
temperature 2. The objective per token is (1 - alpha) CE + alpha T^2 KL(teacher_T ||
student_T), the teacher running frozen inside the same jitted step (stlm/train/distill.py).
Why: the paper's Section 2.2 names distillation (a student trained on the teacher's whole
distribution, as DistilBERT) among the ways to a better tiny model at equal size.

  python main.py --config=configs/baseline.py --config.model.hidden_dim=128 \
      --config.model.num_heads=4 --config.model.ffn_dim=384 --workdir=runs/teacher
  python main.py --config=configs/distill.py --config.train.distill.teacher=runs/teacher/export
"""

from configs import baseline


def get_config(preset: str = 'tiny'):
  c = baseline.get_config(preset)
  c.name = 'distill'
  c.train.distill.required = True   # without a teacher this would be the plain baseline
  c.train.distill.alpha = 0.5
  c.train.distill.temperature = 2.0
  return c
