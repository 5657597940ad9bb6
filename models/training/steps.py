"""One jitted training step per recipe: the optimiser, augmentation, the adversarial or
domain-adapted loss, and the descent (`make_train_step`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from advsweep.attacks import gradient
from advsweep.models import architectures, domain, transforms, zoo
from advsweep.models.training import adversary


def make_optimizer(recipe: zoo.TrainRecipe, total_steps: int) -> optax.GradientTransformation:
  """One-cycle schedule (linear warm-up, then linear decay to zero) with Adam or SGD."""
  warmup = max(1, int(recipe.warmup_fraction * total_steps))
  schedule = optax.join_schedules([
      optax.linear_schedule(recipe.peak_lr / 10, recipe.peak_lr, warmup),
      optax.linear_schedule(recipe.peak_lr, 0.0, max(1, total_steps - warmup)),
  ], [warmup])
  if recipe.optimizer == "adam":
    base = optax.adam(schedule)
  elif recipe.optimizer == "sgd":
    base = optax.sgd(schedule, momentum=0.9, nesterov=True)
  else:
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; valid choices: adam, sgd")
  if not recipe.weight_decay:
    return base
  # Decay only the weight matrices and kernels, not biases or BatchNorm scales.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  return optax.chain(optax.add_decayed_weights(recipe.weight_decay, decay_mask), base)


def augment(key: jax.Array, images: jnp.ndarray, max_shift: int = 2) -> jnp.ndarray:
  """Random horizontal flip and translation by up to `max_shift` pixels (reflect padding)."""

  def one(key, image):
    flip_key, shift_key = jax.random.split(key)
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    padded = jnp.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                     mode="reflect")
    dy, dx = jax.random.randint(shift_key, (2,), 0, 2 * max_shift + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def _per_image_loss(recipe: zoo.TrainRecipe):
  if recipe.loss == "cross_entropy":
    return optax.softmax_cross_entropy_with_integer_labels
  if recipe.loss == "gauss":
    return architectures.gauss_loss
  raise ValueError(f"unknown loss {recipe.loss!r}; valid choices: cross_entropy, gauss")


def make_train_step(module, tx, recipe: zoo.TrainRecipe):
  attack = adversary.training_attack(recipe)
  # The slides' GAN defense: examples from a fixed generator in place of a gradient attack.
  generator = (adversary.generator_examples(recipe) if recipe.adversary == "advgan"
               else None)
  adversarial = attack is not None or generator is not None
  per_image_loss = _per_image_loss(recipe)
  needs_clean = not adversarial or recipe.clean_weight > 0 or recipe.logit_pairing > 0
  if recipe.domain_weight > 0:
    if adversarial:
      raise ValueError("a recipe takes adversarial training or domain adaptation, not both")
    if recipe.domain_exposure <= 0:
      raise ValueError("domain_weight needs domain_exposure > 0 (the noisy domain's Poisson "
                       "exposure)")
    return _make_domain_step(module, tx, recipe, per_image_loss)

  @jax.jit
  def train_step(variables, opt_state, images_u8, labels, key, eps_scale=1.0):
    aug_key, attack_key = jax.random.split(key)
    images = images_u8.astype(jnp.float32) / 255.0
    if recipe.augment:
      images = augment(aug_key, images)

    def forward(params, x):
      return module.apply({**variables, "params": params}, x, train=True,
                          mutable=["batch_stats"])

    if generator is not None:
      adv = jax.lax.stop_gradient(generator(images, recipe.epsilon * eps_scale))
      batch = jnp.concatenate([images, adv]) if needs_clean else adv
    elif attack is not None:
      # The attack sees the network as the loss does (training-mode BatchNorm); the
      # statistics it would update are dropped.
      attack_fn = lambda params, x: forward(params, x)[0]  # noqa: E731
      scaled = attack.replace(eps=attack.eps * eps_scale,
                              step_size=attack.step_size * eps_scale)
      if recipe.adversary == "n_fgsm":
        adv = adversary.n_fgsm(attack_fn, variables["params"], images, labels, attack_key,
                               scaled.eps, scaled.step_size, recipe.adv_noise)
      else:
        adv = gradient.pgd_core(attack_fn, variables["params"], images, labels, attack_key,
                                scaled).adv_images
      adv = jax.lax.stop_gradient(adv)
      batch = jnp.concatenate([images, adv]) if needs_clean else adv
    else:
      batch = images

    def loss_fn(params):
      logits, updates = forward(params, batch)  # one batch: BatchNorm sees clean and adv
      n = len(labels)
      if not adversarial:
        loss = per_image_loss(logits, labels).mean()
        return loss, (logits, updates)
      clean_logits, adv_logits = (logits[:n], logits[n:]) if needs_clean else (None, logits)
      loss = (1 - recipe.clean_weight) * per_image_loss(adv_logits, labels).mean()
      if recipe.clean_weight > 0:
        loss += recipe.clean_weight * per_image_loss(clean_logits, labels).mean()
      if recipe.logit_pairing > 0:
        pairing = jnp.sum((clean_logits - adv_logits) ** 2, -1).mean()
        loss += recipe.logit_pairing * pairing
      return loss, (clean_logits if needs_clean else adv_logits, updates)

    return _descend(loss_fn, tx, variables, opt_state, labels)

  return train_step


@functools.lru_cache(maxsize=8)
def compiled_train_step(module, recipe: zoo.TrainRecipe, total_steps: int):
  """The optimiser `make_optimizer(recipe, total_steps)` and its `make_train_step`, built
  once per process for equal arguments, so a resumed or repeated run reuses the compiled
  step."""
  tx = make_optimizer(recipe, total_steps)
  return tx, make_train_step(module, tx, recipe)


def _descend(loss_fn, tx, variables, opt_state, labels):
  """One optimiser step on `loss_fn(params) -> (loss, (logits, state updates))`: the new
  variables and optimiser state, the loss and the batch's correct count (traced)."""
  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"])
  step_updates, opt_state = tx.update(grads, opt_state, variables["params"])
  new_vars = {**variables, **updates,
              "params": optax.apply_updates(variables["params"], step_updates)}
  correct = jnp.sum(jnp.argmax(logits, -1) == labels)
  return new_vars, opt_state, loss, correct


def _make_domain_step(module, tx, recipe: zoo.TrainRecipe, per_image_loss):
  """Cross-entropy on the clean batch plus `domain_weight` times the MMD between its latent
  features and those of other training images with Poisson noise (`models.domain`). The
  noisy pass runs in training mode but its BatchNorm statistics are dropped, so the running
  statistics stay the clean domain's, like the undefended twin's."""

  @jax.jit
  def train_step(variables, opt_state, images_u8, labels, key, eps_scale=1.0):
    del eps_scale
    aug_key, noise_key = jax.random.split(key)
    images = images_u8.astype(jnp.float32) / 255.0
    if recipe.augment:
      images = augment(aug_key, images)
    # The noisy domain: the batch's other half of images (not the same ones), unlabelled.
    noisy = transforms.poisson_noise(noise_key, jnp.roll(images, len(images) // 2, axis=0),
                                     recipe.domain_exposure)

    def forward(params, x):
      logits, state = module.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats", "intermediates"])
      latent = architectures.penultimate(state["intermediates"])
      return logits, latent, {k: v for k, v in state.items() if k != "intermediates"}

    def loss_fn(params):
      logits, clean_latent, updates = forward(params, images)
      _, noisy_latent, _ = forward(params, noisy)
      loss = per_image_loss(logits, labels).mean()
      loss += recipe.domain_weight * domain.mmd(clean_latent, noisy_latent)
      return loss, (logits, updates)

    return _descend(loss_fn, tx, variables, opt_state, labels)

  return train_step

