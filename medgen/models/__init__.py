"""Networks are MONAI's; this package builds them from configs and saves/loads them as bundles."""
