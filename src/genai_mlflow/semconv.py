"""Every attribute, metric and baggage name genai-mlflow reads or writes.

Names follow the OpenTelemetry GenAI semantic conventions. They are spelt out here rather than
imported from ``opentelemetry.semconv._incubating``, whose module paths change between releases.
"""

from typing import Final

# Operation and provider
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_SYSTEM: Final = "gen_ai.system"  # superseded by gen_ai.provider.name; read only

OP_CHAT: Final = "chat"
OP_TEXT_COMPLETION: Final = "text_completion"
OP_EMBEDDINGS: Final = "embeddings"
OP_RESPONSES: Final = "chat"  # the Responses API is a chat operation in semconv

PROVIDER_OPENAI: Final = "openai"
PROVIDER_AZURE: Final = "azure.ai.openai"

# Request
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_FREQUENCY_PENALTY: Final = "gen_ai.request.frequency_penalty"
GEN_AI_REQUEST_PRESENCE_PENALTY: Final = "gen_ai.request.presence_penalty"
GEN_AI_REQUEST_STOP_SEQUENCES: Final = "gen_ai.request.stop_sequences"
GEN_AI_REQUEST_SEED: Final = "gen_ai.request.seed"
GEN_AI_REQUEST_CHOICE_COUNT: Final = "gen_ai.request.choice.count"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
GEN_AI_REQUEST_ENCODING_FORMATS: Final = "gen_ai.request.encoding_formats"
GEN_AI_EMBEDDINGS_DIMENSION_COUNT: Final = "gen_ai.embeddings.dimension.count"
GEN_AI_OUTPUT_TYPE: Final = "gen_ai.output.type"
# Request parameters without a semconv name of their own: gen_ai.request.<param>, with a prefix
# so that every parameter given is on the span.
GEN_AI_REQUEST_PREFIX: Final = "gen_ai.request."
OPENAI_API_TYPE: Final = "openai.api.type"  # chat_completions | responses
OPENAI_REQUEST_SERVICE_TIER: Final = "openai.request.service_tier"
OPENAI_RESPONSE_SERVICE_TIER: Final = "openai.response.service_tier"
OPENAI_RESPONSE_SYSTEM_FINGERPRINT: Final = "openai.response.system_fingerprint"

# Response
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: Final = "gen_ai.response.time_to_first_chunk"

# Usage
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"

# Content
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"
GEN_AI_TOOL_DEFINITIONS: Final = "gen_ai.tool.definitions"
# Tool calls without content capture: ids and names only.
GENAI_MLFLOW_TOOL_CALL_IDS: Final = "genai_mlflow.tool_call.ids"
GENAI_MLFLOW_TOOL_CALL_NAMES: Final = "genai_mlflow.tool_call.names"

# Agent and session
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
USER_ID: Final = "user.id"

# Transport and errors
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
ERROR_TYPE: Final = "error.type"

# Metrics
METRIC_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
METRIC_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
METRIC_TIME_TO_FIRST_CHUNK: Final = "gen_ai.client.operation.time_to_first_chunk"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
TOKEN_TYPE_INPUT: Final = "input"
TOKEN_TYPE_OUTPUT: Final = "output"

# Bucket boundaries from the GenAI metrics conventions.
TOKEN_USAGE_BUCKETS: Final = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
)
DURATION_BUCKETS: Final = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)

# Environment variables
ENV_CAPTURE_CONTENT: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

# GenAI operations that are not model calls; an agent span's usage, if any, sums its model calls.
OP_EXECUTE_TOOL: Final = "execute_tool"
OP_INVOKE_AGENT: Final = "invoke_agent"
OP_CREATE_AGENT: Final = "create_agent"
NON_MODEL_OPERATIONS: Final = frozenset({OP_EXECUTE_TOOL, OP_INVOKE_AGENT, OP_CREATE_AGENT})

# Other OpenTelemetry names read by the exporter
OPENAI_REQUEST_PREFIX: Final = "openai.request."
SESSION_ID: Final = "session.id"
SERVICE_NAME: Final = "service.name"

# MLflow span attributes (see docs/mlflow-otlp-notes.md)
MLFLOW_SPAN_INPUTS: Final = "mlflow.spanInputs"
MLFLOW_SPAN_OUTPUTS: Final = "mlflow.spanOutputs"
MLFLOW_LLM_COST: Final = "mlflow.llm.cost"
MLFLOW_TRACE_TAG_PREFIX: Final = "mlflow.traceTag."  # root-span attribute prefix that becomes a trace tag
MLFLOW_TRACE_NAME: Final = "mlflow.traceName"
MLFLOW_RUN_NAME: Final = "mlflow.runName"

# genai-mlflow's own tags and attributes
GENAI_MLFLOW_TRACE_ID: Final = "genai_mlflow.trace_id"
GENAI_MLFLOW_PERSONA: Final = "genai_mlflow.persona"
GENAI_MLFLOW_DATE: Final = "genai_mlflow.date"
GENAI_MLFLOW_WINDOW: Final = "genai_mlflow.window"
GENAI_MLFLOW_APP_VERSION: Final = "genai_mlflow.app_version"
SERVICE_VERSION: Final = "service.version"  # the resource's app version, where a span has none

# Prompt versions and A/B variants (span attributes, run params and trace tags; see context.py).
# genai_mlflow.prompts lists every prompt a call used as "name/version", comma-separated, outermost
# scope first; prompt.name and prompt.version are the innermost one's.
GENAI_MLFLOW_PROMPTS: Final = "genai_mlflow.prompts"
GENAI_MLFLOW_PROMPT_NAME: Final = "genai_mlflow.prompt.name"
GENAI_MLFLOW_PROMPT_VERSION: Final = "genai_mlflow.prompt.version"
GENAI_MLFLOW_AB_TEST: Final = "genai_mlflow.ab_test"
GENAI_MLFLOW_VARIANT: Final = "genai_mlflow.variant"
# Trace tags the comparison reads, since a trace's info carries no model and no time to first token.
GENAI_MLFLOW_MODEL: Final = "genai_mlflow.model"
GENAI_MLFLOW_TTFT_MS: Final = "genai_mlflow.ttft_ms"
GENAI_MLFLOW_COMPARISON_OF: Final = "genai_mlflow.comparison_of"  # the persona a comparison run is about
MLFLOW_LINKED_PROMPTS: Final = "mlflow.linkedPrompts"  # JSON [{"name", "version"}], as MLflow writes it
GENAI_MLFLOW_PARAMS_TRUNCATED: Final = "genai_mlflow.params_truncated"
GENAI_MLFLOW_COST_UNKNOWN_MODELS: Final = "genai_mlflow.cost_unknown_models"
GENAI_MLFLOW_REMOTE_PARENT_SPAN_ID: Final = "genai_mlflow.remote_parent_span_id"
GENAI_MLFLOW_OFFLOADED: Final = "genai_mlflow.offloaded"

# MLflow run params, metrics and tags (mode call and window)
PARAM_MODEL: Final = "model"
PARAM_PROVIDER: Final = "provider"
PARAM_OPERATION: Final = "operation"
PARAM_REQUEST_PREFIX: Final = "request."
PARAM_MIXED: Final = "mixed"
METRIC_PROMPT_TOKENS: Final = "prompt_tokens"
METRIC_COMPLETION_TOKENS: Final = "completion_tokens"
METRIC_TOTAL_TOKENS: Final = "total_tokens"
METRIC_CACHED_TOKENS: Final = "cached_tokens"
METRIC_REASONING_TOKENS: Final = "reasoning_tokens"
METRIC_COST_USD: Final = "cost_usd"
METRIC_LLM_CALLS: Final = "llm_calls"
METRIC_LATENCY_MS: Final = "latency_ms"
METRIC_TIME_TO_FIRST_TOKEN_MS: Final = "time_to_first_token_ms"
TAG_FINISH_REASONS: Final = "finish_reasons"
PARAM_PROMPTS: Final = "prompts"
PARAM_PROMPT_NAME: Final = "prompt.name"
PARAM_PROMPT_VERSION: Final = "prompt.version"
PARAM_AB_TEST: Final = "ab_test"
PARAM_VARIANT: Final = "variant"
PARAM_APP_VERSION: Final = "app_version"
