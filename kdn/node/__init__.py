"""The storage node: the gRPC servicer (``servicer``), its link to the controller (``controller_link``), the tier
stack that routes puts and gets (``tier_stack``) and the tiers themselves (``tiers``). Never imports the client or
the controller."""
