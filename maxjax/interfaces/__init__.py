"""The ``max.interfaces`` surface: requests, outputs, statuses, sampling parameters and protocols.

Pure Python and numpy (no JAX), so a scheduler or server process can import it without a device.
"""

from .outputs import (
    AudioGenerationMetadata,
    AudioGenerationResponse,
    AudioGeneratorOutput,
    EmbeddingsOutput,
    LogProbabilities,
    SchedulerResult,
    SharedMemoryArray,
    TextGenerationOutput,
)
from .protocols import (
    AudioGenerator,
    EmbeddingsGenerator,
    InputContext,
    PipelineOutput,
    PipelineTokenizer,
    TokenGenerator,
)
from .requests import (
    AudioGenerationRequest,
    Request,
    RequestID,
    TextGenerationInputs,
    TextGenerationRequest,
    TextGenerationRequestFunction,
    TextGenerationRequestMessage,
    TextGenerationRequestTool,
    TextGenerationResponseFormat,
)
from .sampling import SamplingParams
from .status import GenerationStatus, SchedulerStatus
from .tasks import PipelineTask

__all__ = [
    "AudioGenerationMetadata",
    "AudioGenerationRequest",
    "AudioGenerationResponse",
    "AudioGenerator",
    "AudioGeneratorOutput",
    "EmbeddingsGenerator",
    "EmbeddingsOutput",
    "GenerationStatus",
    "InputContext",
    "LogProbabilities",
    "PipelineOutput",
    "PipelineTask",
    "PipelineTokenizer",
    "Request",
    "RequestID",
    "SamplingParams",
    "SchedulerResult",
    "SchedulerStatus",
    "SharedMemoryArray",
    "TextGenerationInputs",
    "TextGenerationOutput",
    "TextGenerationRequest",
    "TextGenerationRequestFunction",
    "TextGenerationRequestMessage",
    "TextGenerationRequestTool",
    "TextGenerationResponseFormat",
    "TokenGenerator",
]
