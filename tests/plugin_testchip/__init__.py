"""A chip vendor's plugin as it would live outside moeport (for the tests): Backend classes alone.

`TestChipBackend` drives the CPU through the generic backend, as a plugin for a device
torch already drives would, and offers the MoE experts its own fused kernel in the one
place a plugin declares anything: its class. `WrongChipBackend` offers one that answers
wrong, which moeport must refuse. A real plugin would also list its class under the
`moeport.backends` entry points; profiles here name it as "plugin_testchip:TestChipBackend".
"""

from moeport.backends.generic import GenericBackend


class TestChipBackend(GenericBackend):
    """The CPU as a vendor's device, with a fused-experts kernel of the vendor's own."""

    name = "testchip"
    device_type = "cpu"
    default_collectives = "gloo"
    expert_kernels = {"fused_experts": "plugin_testchip.kernels:fused_experts"}


class WrongChipBackend(TestChipBackend):
    """The same device, with a fused-experts kernel that answers wrong."""

    name = "wrongchip"
    expert_kernels = {"fused_experts": "plugin_testchip.kernels:wrong_fused_experts"}
