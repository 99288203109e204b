"""`keel bench …`: measurements of keel's own cost and quality, each against a baseline run side by side."""
