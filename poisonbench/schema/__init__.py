"""What a job is and what it leaves: the job-config schema and the result format."""
