from locoswarm.node._hivemind import defer

defer()  # before any module of the node imports hivemind's subpackages
