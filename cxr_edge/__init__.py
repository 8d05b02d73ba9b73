"""cxr-edge: edge-deployable chest X-ray classification. Not for diagnostic use."""
from .classifier import Classifier, load
from .postprocess import DISCLAIMER, Result
from .decode import DecodeError
from .inputs import Pixels
from .package import ModelPackage, PackageError
from .preprocess import PreprocessSpec, preprocess

__version__ = "0.1.0"
__all__ = ["load", "Classifier", "Result", "ModelPackage", "PackageError", "PreprocessSpec", "preprocess",
           "DecodeError", "Pixels", "DISCLAIMER", "__version__"]
