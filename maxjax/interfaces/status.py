"""Status enums shared by every pipeline and the scheduler."""

from enum import Enum


class GenerationStatus(str, Enum):
    """Status of one generation: running, or finished and why."""

    ACTIVE = "active"
    END_OF_SEQUENCE = "end_of_sequence"
    MAXIMUM_LENGTH = "maximum_length"

    @property
    def is_done(self) -> bool:
        """True once the generation has stopped (any status but ACTIVE)."""
        return self is not GenerationStatus.ACTIVE


class SchedulerStatus(str, Enum):
    """Status of a pipeline operation as the scheduler reports it to a client."""

    ACTIVE = "active"
    CANCELLED = "cancelled"
    COMPLETE = "complete"
