"""The planner: what an ScMoE (or DeepSeek-style MoE) model reaches on an accelerator, per schedule.

`moeport plan` costs one layer of a model on a hardware description, part by part
(stages.py), drives its step list under three schedules (schedules.py: sequential,
LongCat's single-batch overlap, two-micro-batch overlap) and reports the time per output
token, throughput and cost (planner.py, report.py, plot.py). Hardware descriptions are
validated like the rest of a profile (hardware.py; shipped ones in hardware/), and
`--calibrate` measures this machine to write one (calibrate.py). command.py is the command.

Modules are imported where used: `import moeport.plan` loads nothing heavy.
"""
