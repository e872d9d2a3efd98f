"""Pipeline task kinds and the output type each produces."""

from enum import Enum

from .outputs import AudioGeneratorOutput, EmbeddingsOutput, TextGenerationOutput


class PipelineTask(str, Enum):
    """The kinds of pipeline maxjax can run."""

    TEXT_GENERATION = "text_generation"
    EMBEDDINGS_GENERATION = "embeddings_generation"
    AUDIO_GENERATION = "audio_generation"
    SPEECH_TOKEN_GENERATION = "speech_token_generation"

    @property
    def output_type(self) -> type:
        """The output class a pipeline of this task returns per request."""
        return _OUTPUT_TYPES[self]


_OUTPUT_TYPES = {
    PipelineTask.TEXT_GENERATION: TextGenerationOutput,
    PipelineTask.EMBEDDINGS_GENERATION: EmbeddingsOutput,
    PipelineTask.AUDIO_GENERATION: AudioGeneratorOutput,
    PipelineTask.SPEECH_TOKEN_GENERATION: TextGenerationOutput,
}
