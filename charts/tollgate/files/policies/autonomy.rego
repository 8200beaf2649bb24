# Autonomy stages, from the agent label tollgate.dev/autonomy or data.tollgate_config.autonomy_stage:
#   observe                      read only: every mutating call is refused
#   approve-writes               every mutating call needs approval
#   autonomous-under-thresholds  (default) the other rules decide
# A tool labelled tollgate.dev/read-only="true" (e.g. an MCP lookup over POST) is not a write.
package tollgate

import rego.v1

default autonomy_stage := "autonomous-under-thresholds"

autonomy_stage := s if {
	s := input.agent.labels["tollgate.dev/autonomy"]
}

autonomy_stage := s if {
	not input.agent.labels["tollgate.dev/autonomy"]
	s := data.tollgate_config.autonomy_stage
}

autonomy_write if {
	not input.request.method in {"GET", "HEAD", "OPTIONS"}
	not input.tool.labels["tollgate.dev/read-only"] == "true"
}

deny contains msg if {
	autonomy_stage == "observe"
	autonomy_write
	msg := sprintf("agent %v is in the observe stage: %v is a write and is not allowed", [input.agent.name, input.tool.name])
}

require_approval contains msg if {
	autonomy_stage == "approve-writes"
	autonomy_write
	msg := sprintf("agent %v is in the approve-writes stage: %v needs approval", [input.agent.name, input.tool.name])
}

deny contains msg if {
	not autonomy_stage in {"observe", "approve-writes", "autonomous-under-thresholds"}
	msg := sprintf("unknown autonomy stage %v", [autonomy_stage])
}
