"""The PyTorch peer of affect_jax's multi-task network, in plain torch.

torchvision's ResNet-18 structure (conv1 7x7/2, max-pool 3x3/2, four stages of two
BasicBlocks, v1.5 strides, global average pool) written out without torchvision, the
same three heads (expression logits, 12 AU logits, tanh valence-arousal) and the same
losses as affect_jax.train.losses for the default config: masked cross-entropy, masked
binary cross-entropy, 1 - CCC (mean over valence and arousal, population moments).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

MEAN_RGB = torch.tensor([0.485, 0.456, 0.406]) * 255
STDDEV_RGB = torch.tensor([0.229, 0.224, 0.225]) * 255


class BasicBlock(nn.Module):

  def __init__(self, in_planes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    residual = x if self.downsample is None else self.downsample(x)
    return F.relu(y + residual)


class MultiTaskResNet(nn.Module):
  """ResNet-18 backbone + expression / AU / VA heads (linear, as the default config)."""

  def __init__(self, num_expr_classes: int = 8, num_aus: int = 12, width: int = 64,
               stage_sizes=(2, 2, 2, 2)):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    layers, in_planes = [], width
    for stage, blocks in enumerate(stage_sizes):
      planes = width * 2 ** stage
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        layers.append(BasicBlock(in_planes, planes, stride))
        in_planes = planes
    self.layers = nn.Sequential(*layers)
    self.expression_head = nn.Linear(in_planes, num_expr_classes)
    self.au_head = nn.Linear(in_planes, num_aus)
    self.va_head = nn.Linear(in_planes, 2)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, images_uint8):
    """uint8 images (NCHW tensor, any memory format) -> dict of float32 outputs."""
    mean = MEAN_RGB.view(1, 3, 1, 1).to(images_uint8.device)
    std = STDDEV_RGB.view(1, 3, 1, 1).to(images_uint8.device)
    x = (images_uint8.float() - mean) / std
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layers(x)
    features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return {"expression": self.expression_head(features), "au": self.au_head(features),
            "va": torch.tanh(self.va_head(features))}


def _safe_divide(numerator, denominator):
  return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12),
                     torch.zeros_like(numerator))


def concordance(predictions, targets, mask):
  """CCC per column over the frames with mask > 0 (population moments, two passes)."""
  weight = (mask > 0).float()[:, None]
  count = weight.sum(0)
  mean_x = _safe_divide((weight * predictions).sum(0), count)
  mean_y = _safe_divide((weight * targets).sum(0), count)
  cx, cy = weight * (predictions - mean_x), weight * (targets - mean_y)
  var_x, var_y = _safe_divide((cx ** 2).sum(0), count), _safe_divide((cy ** 2).sum(0), count)
  cov = _safe_divide((cx * cy).sum(0), count)
  return _safe_divide(2 * cov, var_x + var_y + (mean_x - mean_y) ** 2)


def multitask_loss(outputs, batch):
  """CE + BCE + (1 - CCC), each masked as affect_jax.train.losses does."""
  expression_valid = (batch["expression_mask"] > 0).float()
  ce = F.cross_entropy(outputs["expression"], batch["expression"], reduction="none")
  expression = _safe_divide((ce * expression_valid).sum(), expression_valid.sum())
  au_valid = (batch["au_mask"] > 0).float()
  bce = F.binary_cross_entropy_with_logits(outputs["au"], batch["au"], reduction="none")
  au = _safe_divide((bce * au_valid).sum(), au_valid.sum())
  va = (1 - concordance(outputs["va"], batch["valence_arousal"], batch["va_mask"])).mean()
  return expression + au + va


def make_optimizer(model, learning_rate=0.1):
  """SGD with Nesterov momentum 0.9 and weight decay 1e-4 on conv/linear weights only,
  as affect_jax's default optimizer."""
  decay = [p for n, p in model.named_parameters() if p.ndim > 1]
  no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
  return torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                          {"params": no_decay, "weight_decay": 0.0}],
                         lr=learning_rate, momentum=0.9, nesterov=True)


def to_torch_batch(batch_numpy: dict, channels_last: bool) -> dict:
  """A NumPy NHWC uint8 batch (affect_jax's layout) -> torch tensors (NCHW view)."""
  images = torch.from_numpy(batch_numpy["image"]).permute(0, 3, 1, 2)
  images = images.contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
  out = {"image": images}
  for key in ("expression_mask", "au", "au_mask", "valence_arousal", "va_mask"):
    out[key] = torch.from_numpy(batch_numpy[key])
  out["expression"] = torch.from_numpy(batch_numpy["expression"]).long()
  return out


def make_steps(model, optimizer):
  def train_step(batch):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = multitask_loss(model(batch["image"]), batch)
    loss.backward()
    optimizer.step()
    return loss

  def eval_step(batch):
    model.eval()
    with torch.inference_mode():
      return model(batch["image"])

  return train_step, eval_step
