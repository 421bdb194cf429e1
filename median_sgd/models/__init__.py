"""The models of the book's experiments, in plain torch (no torchvision needed).

One module per family; every public name is re-exported here.
"""

from .cnn import LeNet, ResNet18, TinyCNN, count_parameters, resnet18
from .transformer import TransformerLM
