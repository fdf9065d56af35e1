"""What was done, kept and claimed: the state store, the audit trail, the archive, claims."""
