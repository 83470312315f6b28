"""APEL accounting: archive, dirq outgoing queue, sync records and the STOMP sender."""
