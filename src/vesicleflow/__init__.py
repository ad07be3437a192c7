"""vesicleflow: find every synaptic vesicle in cryo-electron tomograms."""

__version__ = "0.1.0"
