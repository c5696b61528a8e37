"""The `echoink` commands and the jobs that chain the driver's pieces: an evaluation of any
checkpoint on engines of its own, the warm start, the paper's reproduction (curate → evaluate →
train → evaluate → report). A training run itself is `orchestrator`'s."""
