"""Precomputed-latent datasets: record format, atomic writers, the grain pipeline, the demo dataset."""

from mmdit_jax.data.pipeline import HOST_ONLY, ON_CORRUPT, SD3_TEXT_DROPOUT, Dataset, PipelineConfig
from mmdit_jax.data.records import CorruptRecord, DataError, Feature, Metadata, load_metadata
from mmdit_jax.data.writer import DatasetWriter, write_arrays
