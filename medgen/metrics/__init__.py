"""Quality metrics: paired image metrics, realism (feature and radiomics distances), diversity,
plausibility and memorization, and the gate that turns them into verdicts."""
