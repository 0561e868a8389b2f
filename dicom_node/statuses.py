"""The DIMSE statuses the node answers with, in one place (PS3.4 and PS3.7 Annex C), shared by
C-STORE, STOW-RS (its FailureReason is the C-STORE status), C-FIND, C-MOVE and C-GET."""

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700  # disk full, database unreachable or failing
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # C-STORE: missing or invalid UIDs, an image without pixels
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # C-FIND, C-MOVE, C-GET: an invalid query (the same code)
UNABLE_TO_PROCESS = 0xC000  # query/retrieve: an identifier that cannot be decoded, or an error of the node
CANNOT_UNDERSTAND = 0xC210  # C-STORE: undecodable or truncated
PROCESSING_FAILURE = 0xC211  # C-STORE: any other storage error
