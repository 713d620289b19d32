"""Sites and data: where samples come from and how they are dealt to data-center sites.

One partition is one site, with its own train and test split; the server keeps a holdout set for
central evaluation that no site sees. Sources: sklearn's bundled digits (default, no download), a
seeded synthetic generator, local files (``.npz``, CSV, Parquet, a ``save_to_disk`` directory) and
Hugging Face datasets through ``flwr_datasets.FederatedDataset`` (``"hf:<name>"``). Partitioning
uses flwr-datasets' ``IidPartitioner``, ``DirichletPartitioner`` and ``PathologicalPartitioner``.

Typical use::

    from fedcore.data import DataSettings, load_site, load_holdout

    settings = DataSettings(sites=10, partition="dirichlet", alpha=0.3, seed=1)
    site = load_site(settings, 3)                # in a site's ClientApp; cached per process
    holdout, input_shape, num_classes = load_holdout(settings)   # on the server

Every failure is a :class:`fedcore.errors.ConfigError` whose one-line message names the setting
and the value given.
"""

from fedcore.data.arrays import ArrayDataset, FederatedData, SiteData
from fedcore.data.federation import clear_cache, load_federation, load_holdout, load_site
from fedcore.data.partition import MIN_SITE_SAMPLES
from fedcore.data.settings import DataSettings, Partition

__all__ = [
    "MIN_SITE_SAMPLES",
    "ArrayDataset",
    "DataSettings",
    "FederatedData",
    "Partition",
    "SiteData",
    "clear_cache",
    "load_federation",
    "load_holdout",
    "load_site",
]
