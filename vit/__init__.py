"""vit: Vision Transformers for image classification, from first principles to many GPUs.

>>> import vit
>>> model = vit.create_model("vit_tiny_patch16_224", num_classes=10)
>>> vit.list_models("vit_*")[:2]
['vit_base_patch16_224', 'vit_base_patch32_224']
"""
from vit import zoo as _zoo  # noqa: F401  (registers every named model)
from vit.baselines import CifarCNN, LinearClassifier, SmallCNN, resnet18_cifar
from vit.attention import MultiHeadAttention, scaled_dot_product_attention
from vit.layers import PatchEmbed
from vit.model import Block, VisionTransformer, count_parameters
from vit.pos_embed import resample_position_embedding
from vit.registry import create_model, get_model_spec, list_models, register_model
from vit.timm_interop import from_timm, to_timm

__version__ = "0.1.0"

__all__ = [
    "Block", "CifarCNN", "LinearClassifier", "MultiHeadAttention", "PatchEmbed", "SmallCNN",
    "VisionTransformer", "count_parameters", "create_model", "from_timm", "get_model_spec",
    "list_models", "register_model", "resample_position_embedding", "resnet18_cifar",
    "scaled_dot_product_attention", "to_timm",
]
