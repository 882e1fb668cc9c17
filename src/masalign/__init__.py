"""masalign: Model Alignment Search (MAS) and Distributed Alignment Search (DAS)."""
