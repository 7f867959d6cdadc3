"""DIMSE status codes (PS3.7 Annex C, and C.4.2 for C-STORE) as the node answers and reads them:
the Status (0000,0900) of a C-STORE or C-ECHO response."""

from __future__ import annotations

SUCCESS = 0x0000

# Warnings: the peer has the instance, with a remark (PS3.7 C.4.2 and Annex C)
OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001  # requested optional attributes are not supported
ATTRIBUTE_LIST_ERROR = 0x0107
ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
# 0xB000-0xBFFF: stored with a warning (0xB000 coercion of data elements, 0xB006 elements
# discarded, 0xB007 data set does not match the SOP class)

# Failures
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122  # refused: SOP class not supported
CANNOT_UNDERSTAND = 0xC000  # error: cannot understand (0xC000-0xCFFF)
OUT_OF_RESOURCES = 0xA700  # refused: out of resources (0xA700-0xA7FF); the sender may retry later

# The statuses of a C-STORE response that mean the peer has the instance, besides 0xBxxx
STORED = (SUCCESS, OPTIONAL_ATTRIBUTES_NOT_SUPPORTED, ATTRIBUTE_LIST_ERROR,
          ATTRIBUTE_VALUE_OUT_OF_RANGE)  # fmt: skip


def is_storage_warning(status: int) -> bool:
    """0xB000-0xBFFF: a C-STORE warning; the instance was stored."""
    return status >> 12 == 0xB


def is_out_of_resources(status: int) -> bool:
    """0xA700-0xA7FF: refused for lack of resources; trying again later may succeed."""
    return status >> 8 == 0xA7
