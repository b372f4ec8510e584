"""Quality: metrics (image, features, fidelity, diversity, privacy), the gate that turns them into
verdicts, validation of a synthesis run, and its report. Inference only: never imports training."""
