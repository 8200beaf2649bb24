# Irreversible actions need a human. Financial tools are governed by their amount thresholds
# (financial.rego) instead. Config: irreversible_exempt_tools (names).
package tollgate

import rego.v1

require_approval contains msg if {
	input.tool.risk.reversible == false
	not input.tool.risk.financial
	not input.tool.name in object.get(data.tollgate_config, "irreversible_exempt_tools", [])
	msg := sprintf("%v cannot be undone; a human must approve it", [input.tool.name])
}
