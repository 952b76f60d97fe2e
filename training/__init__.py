"""fastai training: the fastbook chapter-7 recipe -> a sota-serve model package.

fastai's habits (``import *``, ``@patch``, pickled Learners) stay inside this package, and
no pickle leaves it: what comes out is ONNX and TorchScript plus a card.
"""
