"""The space: VacQuery protocol, UDP responder and query client."""
