"""Where the code runs: the device (device), the torch.distributed world (distributed), the launcher
(launch, relay), stop signals (signals), and the root folders' bare names handed to installed
packages (shadowing)."""
