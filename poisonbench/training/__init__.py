"""Running one job: its poisons crafted or fetched, the victim trained (or the perturbations analysed), measured, and result.json written last."""
