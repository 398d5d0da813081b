"""Where work runs and what it writes to: the workspace folder, background jobs, torchrun's
ranks, and text made safe for Markdown. Imports db/ only; every other group may import it."""
