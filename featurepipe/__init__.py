"""featurepipe: does a classical head on deep features beat the end-to-end CNN?"""

__version__ = "0.1.0"
