"""What users look at after an evaluation: the visual report (``report``)."""
