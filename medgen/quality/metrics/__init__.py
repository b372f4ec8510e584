"""Quality metrics: paired image metrics, realism (feature and radiomics distances), diversity and
memorization."""
