"""Training the zoo models with optax (`train_and_evaluate`): deterministic from a seed, one
jitted step a batch, resumable, and the defenses' recipes (`models.zoo.TrainRecipe`) carried
out. A defense's recipe attacks each batch inside the jitted step with the gradient attacks'
traceable core (`attacks.gradient.pgd_core`): adversarial training (Goodfellow et al. 2015;
Madry et al. 2018; Wong, Rice, Kolter 2020; de Jorge et al. 2022), logit pairing (Kannan,
Kurakin, Goodfellow 2018); domain adaptation (Ciprijanovic et al.) adds an MMD loss toward
Poisson-noised images.

- `adversary`: the training attack a recipe asks for, N-FGSM, the eps ramp;
- `steps`: the optimiser and the jitted training step;
- `guard`: the overfitting guard and the check whose weights ship;
- `state`: the loop's state (`LoopState`, a named pytree) and its resume file;
- `loop`: the loop itself and warm starts.
"""

from advsweep.models.training.adversary import eps_scale, n_fgsm, training_attack
from advsweep.models.training.loop import (
  TrainResult,
  epoch_path,
  train_and_evaluate,
  warm_start,
)
from advsweep.models.training.state import LoopState, load_state, resume_path
from advsweep.models.training.steps import augment, make_optimizer, make_train_step

__all__ = ["LoopState", "TrainResult", "augment", "epoch_path", "eps_scale", "load_state",
           "make_optimizer",
           "make_train_step", "n_fgsm", "resume_path", "train_and_evaluate", "training_attack",
           "warm_start"]
