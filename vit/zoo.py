"""Every named model of the package, registered with its defining arguments."""
from __future__ import annotations

from vit.baselines import CifarCNN, LinearClassifier, SmallCNN, resnet18_cifar
from vit.model import VisionTransformer
from vit.registry import get_model_spec, register_model

# The ViT paper's family (Table 1, plus DeiT's tiny/small), at 224x224 and 1000 classes.
for _name, _patch, _dim, _depth, _heads in (
    ("vit_tiny_patch16_224", 16, 192, 12, 3),
    ("vit_small_patch16_224", 16, 384, 12, 6),
    ("vit_base_patch16_224", 16, 768, 12, 12),
    ("vit_base_patch32_224", 32, 768, 12, 12),
    ("vit_large_patch16_224", 16, 1024, 24, 16),
    ("vit_huge_patch14_224", 14, 1280, 32, 16),
):
    register_model(_name, VisionTransformer, f"ViT {_dim}-dim, {_depth} blocks, {_heads} heads, {_patch}px patches",
                   img_size=224, patch_size=_patch, embed_dim=_dim, depth=_depth, num_heads=_heads)

# Small-image ViTs. 4x4 patches keep enough tokens (49 / 64) for attention to matter on
# 28x28 and 32x32 inputs; widths are chosen so that a CPU trains them in minutes.
register_model(
    "vit_mnist", VisionTransformer, "ViT for 1x28x28 digits: 4px patches, 7x7 grid, 64-dim, 6 blocks",
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4, mlp_ratio=2.0,
)
register_model(
    "vit_cifar", VisionTransformer, "ViT for 3x32x32 images: 4px patches, 8x8 grid, 192-dim, 6 blocks, 12 heads",
    img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192, depth=6, num_heads=12, mlp_ratio=2.0,
)

# Small-data ViTs. Compact Convolutional Transformers (Hassani et al. 2021): a conv tokenizer,
# sequence pooling, no class token, no qkv bias; "cct_7_3x1" = 7 blocks, 3x3 kernels, 1 conv layer.
# The parameter counts are the paper's (Table 1: 3.76M and 0.28M; ViT-Lite-7/4 3.72M).
_CCT = dict(tokenizer="conv", conv_kernel=3, class_token=False, global_pool="seq", qkv_bias=False)
register_model("cct_7_3x1_32", VisionTransformer, "CCT-7/3x1 for 3x32x32: 256-dim, 7 blocks, 4 heads (3.76M)",
               img_size=32, in_chans=3, num_classes=10, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0,
               conv_layers=1, **_CCT)
register_model("cct_2_3x2_32", VisionTransformer, "CCT-2/3x2 for 3x32x32: 128-dim, 2 blocks, 2 heads (0.28M)",
               img_size=32, in_chans=3, num_classes=10, embed_dim=128, depth=2, num_heads=2, mlp_ratio=1.0,
               conv_layers=2, **_CCT)
register_model("cct_mnist", VisionTransformer, "CCT-4/3x2 for 1x28x28 digits: 128-dim, 4 blocks, 2 heads",
               img_size=28, in_chans=1, num_classes=10, embed_dim=128, depth=4, num_heads=2, mlp_ratio=1.0,
               conv_layers=2, **_CCT)
register_model("vit_lite_7_4_32", VisionTransformer, "ViT-Lite-7/4 (CCT paper's plain baseline) for 3x32x32 (3.72M)",
               img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=256, depth=7, num_heads=4,
               mlp_ratio=2.0)
# Lee et al. 2021: shifted patch tokenization + locality self-attention on the CIFAR ViT.
register_model("sl_vit_cifar", VisionTransformer, "vit_cifar with shifted patches and locality self-attention",
               img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192, depth=6, num_heads=12,
               mlp_ratio=2.0, tokenizer="spt", locality=True)

# DeiT's distilled variants: a distillation token and head that learn from a teacher's predictions.
for _name in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_mnist", "vit_cifar"):
    _spec = get_model_spec(_name)
    register_model(f"{_name}_distilled", VisionTransformer, f"{_spec.description}, with a distillation token",
                   **_spec.defaults, distilled=True)

register_model("linear_mnist", LinearClassifier, "linear classifier on raw pixels (7,850 parameters on MNIST)",
               num_classes=10, in_chans=1, img_size=28)
register_model("cnn_mnist", SmallCNN, "two-stage CNN for 28x28 digits",
               num_classes=10, in_chans=1, img_size=28)
register_model("cnn_cifar", CifarCNN, "the course's CIFAR CNN (40,198 parameters for 2 classes)",
               num_classes=2, in_chans=3, img_size=32)
register_model("resnet18_cifar", resnet18_cifar, "torchvision ResNet-18 with a small-image stem",
               num_classes=10, in_chans=3, img_size=32)
