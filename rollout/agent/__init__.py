"""Agents: multi-turn tool use with thinking kept across tool calls.

- `messages`: the conversation types and the context rule (`drop_stale_reasoning`).
- `template`: render a conversation for the model and parse what it generated
  (`DeepSeekV32Template` for real checkpoints, `CompactTemplate` for the tiny char tokenizer).
- `context`: test-time context management (`make_room`: summary, discard_75, discard_all).
- `environments`: synthesized, verifiable environments (search, planner, codefix).
- `loop`: multi-turn rollouts (`run_episodes`): many episodes in flight against the rollout engines,
  one RolloutBatch row per episode with a loss mask on the model's own tokens.
- `episode`: one episode's token stream and steps; `schedule`: when each episode is served (independently by
  default: an episode's tool calls run while the engine decodes the others' turns; or in synchronous rounds).
- `summary`: `ModelSummarizer` has the policy write the summaries of the "summary" strategy.
- `tokens`: text to ids and back, a template's stop tokens, one turn's sampling, the context budget.
- `environments.oracles`: scripted solvers that play an environment to a verified answer
  (tests, and cold-start demonstrations of thinking in tool use).
"""

from rollout.agent.context import ContextStrategy, context_metrics, make_room
from rollout.agent.loop import run_episodes
from rollout.agent.messages import Message, ParsedTurn, ToolCall, drop_stale_reasoning
from rollout.agent.summary import ModelSummarizer
from rollout.agent.template import ChatTemplate, CompactTemplate, DeepSeekV32Template, get_template

__all__ = ["ChatTemplate", "CompactTemplate", "ContextStrategy", "DeepSeekV32Template", "Message", "ModelSummarizer",
           "ParsedTurn", "ToolCall", "context_metrics", "drop_stale_reasoning", "get_template", "make_room",
           "run_episodes"]
