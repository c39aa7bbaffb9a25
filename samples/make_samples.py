"""Generate samples/annual_report.pdf, the fictional annual report used in demos and tests.

Run from anywhere:  python samples/make_samples.py
Needs fpdf2 (a dev-only dependency: pip install fpdf2), not needed to use kvcli.

The text is an original work by the kvcli authors (see samples/README.md, CC0 1.0).
Each page of the report is one entry of PAGES and must fit on one PDF page: the script
fails if any page overflows, because tests rely on each fact sitting on a known page.
The output is byte-for-byte reproducible with a given fpdf2 version: the creation date
and producer are fixed, and fpdf2 derives the file ID from the content and that date.
(Another fpdf2 version may lay text out differently and so produce different bytes.)
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from fpdf import FPDF

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "annual_report.pdf"
TITLE = "Northwind Lantern Co. - Annual Report 2024"
# Fixed so re-running the script yields identical bytes.
CREATION_DATE = datetime.datetime(2025, 3, 3, 9, 0, 0, tzinfo=datetime.timezone.utc)

# One (heading, paragraphs) pair per page. Core Helvetica is latin-1 only, so the text
# sticks to plain ASCII: straight quotes, "-" for dashes, "percent" for %.
PAGES: list[tuple[str, list[str]]] = [
    (
        "Northwind Lantern Co. Annual Report 2024",
        [
            "Fiscal year ended December 31, 2024",
            "About the company. Northwind Lantern Co. designs, builds and sells portable lighting for people "
            "who work and travel outdoors: fishermen, rangers, farmers, climbers, campers and the crews who "
            "keep power lines and railways running through the night.",
            "The company was founded in 1962 by Elias Brandvold, a marine electrician who began repairing "
            "storm lanterns for the boats of the western Great Lakes in a rented garage and soon found he "
            "could build better ones himself.",
            "Northwind Lantern Co. is headquartered in Duluth, Minnesota, where its design studio, test "
            "laboratory and customer service team share a converted brick warehouse on the harbor. The "
            "building was renovated in 2016 and is heated in winter partly by the waste heat of the "
            "laboratory's burn-in racks, where every new lamp design runs continuously for a thousand hours "
            "before it is approved for production.",
            "Our purpose has not changed in more than sixty years: to make lights that work when it matters, "
            "that can be repaired rather than thrown away, and that are honest about what they can do. Every "
            "lamp we sell carries a printed runtime that we have measured ourselves at room temperature and "
            "at minus twenty degrees, and every lamp can be opened with an ordinary screwdriver.",
            "This report describes the year 2024: our results, our products, our people and our plants, the "
            "acquisition we completed in the autumn, the risks we see ahead, and the way the company is "
            "governed. Figures are in United States dollars unless stated otherwise. The financial statements "
            "summarized on page 7 were audited by the independent firm named on page 8.",
            "Northwind Lantern Co. is a privately held company. Its shares are owned by members of the "
            "founding family, by a group of long-standing employees through the employee share plan, and by "
            "a small number of outside investors. The company has no debt other than the term loan that "
            "financed its new plant, which is described on page 5.",
        ],
    ),
    (
        "Letter from the Chief Executive Officer",
        [
            "Dear shareholders, colleagues and friends,",
            "2024 was the best year in the history of Northwind Lantern Co. Revenue for 2024 was $48.6 million, "
            "the highest in our sixty-two years, and every one of our three product families grew. We opened "
            "a second plant, brought a respected optics company into the family, and launched the most "
            "ambitious product we have ever made. None of this would have been possible without the skill "
            "and patience of the people who build our lamps, and I want to begin by thanking them.",
            "My name is Margaret Okafor, and I have served as chief executive officer of the company since "
            "2019. When I joined, Northwind was a fine company that had become a little too comfortable. We "
            "sold good lanterns to loyal customers, but we had not launched a new product family in eleven "
            "years, our main plant was running close to capacity, and our younger customers did not know who "
            "we were. Five years later I believe all three of those problems have been addressed, though "
            "none of them is ever solved for good.",
            "The year was not without difficulty. A shortage of lithium cells in the first quarter forced us "
            "to slow production of our rechargeable models for six weeks, and we chose to delay deliveries "
            "rather than substitute cells we had not tested. Some retailers were unhappy with us in March. "
            "By the summer, most of them had told us they were glad we had waited.",
            "We also asked a great deal of our teams in Duluth and at the new plant, and I am conscious that "
            "growth is tiring. In 2025 our priority is to consolidate: to run the new plant at full speed, to "
            "integrate our new colleagues in optics, and to make sure that our service and repair work keeps "
            "pace with our sales.",
            "Finally, I want to thank our customers, who tell us plainly when we get things wrong, and our "
            "shareholders, who have been willing to invest for the long term. I look forward to reporting "
            "to you again next year.",
            "Margaret Okafor, Chief Executive Officer",
        ],
    ),
    (
        "Financial Highlights",
        [
            "Revenue has grown in each of the last three years. Revenue for 2022 was $37.2 million. Revenue "
            "for 2023 was $41.9 million. The growth in 2024 came mainly from the launch of our new headlamp "
            "and from strong sales of storm lanterns to commercial fishing fleets in Canada and Norway.",
            "Gross margin improved to 38.5 percent in 2024, helped by lower aluminum prices in the second "
            "half of the year and by the higher efficiency of our new production line. Operating expenses "
            "rose faster than in previous years, because we hired forty-six new employees, most of them at "
            "the new plant, and because the acquisition described on page 6 brought one-time legal and "
            "integration costs.",
            "Net income for 2024 was $5.1 million, compared with $3.9 million a year earlier. Cash and cash "
            "equivalents at the end of the year were $9.8 million. Capital spending for the year was $11.4 "
            "million, almost all of it for the new plant and its equipment, and was financed partly from "
            "cash and partly with a ten-year term loan from a regional bank.",
            "Sales by region. The United States remained our largest market, with 58 percent of revenue. "
            "Canada accounted for 19 percent, the Nordic countries for 12 percent, and the rest of the world "
            "for 11 percent. Online sales through our own store were 9 percent of revenue, up from 6 percent "
            "in 2023; most of our sales still pass through outdoor retailers and marine chandlers, and we "
            "intend to keep it that way.",
            "Sales by product family. Storm lanterns, the family on which the company was built, made up 47 "
            "percent of revenue. Headlamps made up 34 percent, more than in any previous year. Compact and "
            "emergency lights made up the remaining 19 percent.",
            "Warranty costs fell for the third year in a row, to 1.2 percent of revenue. We believe this is "
            "the clearest measure of whether our lamps are built well, and we report it every year for that "
            "reason.",
        ],
    ),
    (
        "Our Products",
        [
            "Northwind sells three families of lights. All of them share the same principles: measured "
            "runtimes, replaceable parts, and a body that can survive being dropped on a dock in January.",
            "Storm lanterns. Our flagship product is the Harbor Beacon, a waterproof storm lantern with a "
            "cast aluminum body and a borosilicate glass globe. It was first sold in 1971 and has been "
            "redesigned four times since, most recently in 2021 when it moved from incandescent bulbs to "
            "LEDs. In 2024 we sold 61,000 Harbor Beacon lanterns, more than in any year before. Many of them "
            "went to fishing fleets, ferry operators and harbor authorities, who buy them by the crate.",
            "Headlamps. In April 2024 we launched the TrailGlow 300, a rechargeable headlamp with a "
            "maximum output of 300 lumens, a red night mode, and a battery that can be changed in the field "
            "without tools. It is the first Northwind product designed from the start with an electronic "
            "driver of our own, and it won a regional design award in the autumn. The TrailGlow 300 sold "
            "more units in its first eight months than any product we have launched.",
            "Compact and emergency lights. The Ember Mini is a pocket light the size of a thumb that runs "
            "for two weeks on a single cell. It is sold mostly as part of emergency kits for cars, boats "
            "and homes, and through partnerships with two outdoor clubs. We also make a small range of "
            "clip-on marker lights for cyclists and runners.",
            "Repair and spare parts. Every product we have sold since 1985 can still be repaired, and our "
            "parts catalogue now lists more than 1,400 items. In 2024 our repair service in Duluth returned "
            "about 8,300 lamps to their owners. We charge for parts but not for labour on lamps less than "
            "five years old.",
            "Product development. Our design team of twenty-four engineers and industrial designers is "
            "working on a solar charging case for the TrailGlow 300 and on a new version of the Harbor "
            "Beacon with a longer-lasting battery. We do not announce launch dates until products have "
            "passed their thousand-hour tests.",
        ],
    ),
    (
        "Operations and People",
        [
            "At the end of 2024 Northwind Lantern Co. had 412 employees, compared with 366 a year earlier. "
            "About two thirds of them work in manufacturing and the rest in design, sales, service and "
            "administration. Average length of service is just over nine years, and eleven of our colleagues "
            "have been with the company for more than thirty years.",
            "Our original plant in Duluth has assembled lanterns since 1974. It is now used mainly for the "
            "Harbor Beacon, for spare parts and for the repair service. After several years of running "
            "close to capacity, we decided in 2022 to build a second plant rather than extend the old one, "
            "which has no room left to grow on its site by the harbor.",
            "The new plant opened on March 14, 2024 in Ashland, Wisconsin, after eighteen months of "
            "construction. It builds the TrailGlow 300 and the Ember Mini, and has room for a third "
            "production line when demand requires it. The plant employs sixty-eight people, most of whom "
            "were hired locally and trained in Duluth during the winter before it opened. Its roof carries "
            "a solar array that supplies about a fifth of the plant's electricity over the year.",
            "Our chief operating officer, Daniel Reyes, led the project from the choice of site to the first "
            "shipment. The plant was completed two weeks late and about four percent over budget, mainly "
            "because of the cost of steel in 2023.",
            "Safety. We recorded two lost-time injuries in 2024, neither of them serious, against three in "
            "2023. Every new employee spends their first week on safety and quality training before working "
            "on a production line.",
            "Training and pay. Every employee received at least thirty hours of paid training during the "
            "year. In July we raised starting wages at both plants by six percent. The employee share plan, "
            "which allows colleagues to buy shares at a discount, now has 287 members.",
            "Suppliers. We buy aluminum castings, glass, circuit boards and cells from thirty-one main "
            "suppliers, twenty of them in the United States and Canada. We visit each main supplier at "
            "least once a year.",
        ],
    ),
    (
        "Acquisition and Sustainability",
        [
            "On September 9, 2024 Northwind Lantern Co. acquired Lumenfield Optics for $6.3 million in cash. "
            "Lumenfield is a small company based in Portland, Maine that designs and grinds lenses and "
            "reflectors for specialist lights, including lamps for search and rescue boats. We had bought "
            "reflectors from Lumenfield for more than ten years, and when its founders decided to retire "
            "they asked whether we would like to continue their work.",
            "All nineteen Lumenfield employees have joined Northwind, and the company will keep its name, "
            "its workshop and its own customers. Over the next two years we will move the design of all our "
            "reflectors to Lumenfield, which we expect to improve the beam quality of our lamps and to reduce "
            "the cost of each reflector by about a tenth.",
            "Sustainability. Aluminum is the largest material we use, and it is also the one with the largest "
            "environmental footprint. In 2024, 71 percent of the aluminum in our products came from recycled "
            "sources, up from 58 percent in 2023. Our goal is to reach 90 percent by 2027.",
            "Packaging. Since 2023 all our retail packaging has been made of recycled cardboard without "
            "plastic windows or foam. Replacing the last plastic trays in our shipping cartons saved an "
            "estimated eleven tonnes of plastic during the year.",
            "Take-back. Customers can return any Northwind lamp, of any age and in any condition, to our "
            "Duluth repair service or to one of our retail partners. Lamps that can be repaired are refurbished "
            "and donated to community groups and volunteer fire departments; the rest are taken apart and "
            "their metals, glass and cells sent for recycling. We took back about 5,200 lamps in 2024.",
            "Energy. Our two plants and our headquarters used 4.7 gigawatt-hours of electricity in 2024. Just "
            "under a third of it came from renewable sources, including the solar array at the new plant. "
            "We report our energy use and emissions each year in a separate sustainability statement, which "
            "is available on request.",
        ],
    ),
    (
        "Risks and Outlook",
        [
            "Customers. Our largest customer is Baywater Outfitters, a chain of outdoor and marine stores, "
            "which accounted for 14 percent of revenue in 2024. No other customer accounted for more than "
            "6 percent. We value this relationship, which has lasted more than twenty years, but we are "
            "aware of the risk of depending too much on a single retailer and we continue to widen our "
            "network of independent shops.",
            "Supply of cells. Rechargeable lithium cells are the component most exposed to shortages and "
            "price changes. The difficulties of the first quarter of 2024 led us to qualify a second "
            "supplier of cells and to hold a larger safety stock, equal to about ten weeks of production.",
            "Competition. The market for headlamps in particular is crowded, and many competitors sell "
            "lower-priced lamps made in very large volumes. We do not intend to compete on price. We compete "
            "on reliability, repairability and honest specifications, and we believe that the success of the "
            "TrailGlow 300 shows that many customers value these things.",
            "Currency. About a third of our sales are made outside the United States, mostly in Canadian "
            "dollars and Norwegian kroner, while most of our costs are in United States dollars. We hedge "
            "part of our expected foreign currency income for up to twelve months ahead.",
            "Weather and seasons. Sales of lanterns and emergency lights rise after severe storms and "
            "power cuts, which makes our quarterly results uneven. We plan production for an average year "
            "and keep finished stock in reserve for busy ones.",
            "Outlook for 2025. We expect revenue for 2025 of between $53 million and $56 million, assuming "
            "no major disruption to the supply of cells. We plan capital spending of about $3 million, "
            "mostly for tooling for new products, and we expect to repay a quarter of the term loan during "
            "the year. We will also open a small service center in Thunder Bay, Ontario, to support our "
            "customers in Canada.",
        ],
    ),
    (
        "Governance and Auditor",
        [
            "The board. Northwind Lantern Co. is overseen by a board of seven directors, three of whom are "
            "independent of the company and of the founding family. The board met eight times in 2024, "
            "including a two-day visit to the new plant in June. The chair of the board is Ruth Castellano, "
            "a former president of a regional shipbuilding company, who joined the board in 2015.",
            "Committees. The board has an audit committee, a people and pay committee, and a product safety "
            "committee. The audit committee is made up entirely of independent directors. It meets the "
            "auditor at least twice a year without management present.",
            "Auditor. The financial statements for 2024 were audited by Halvorsen & Pike LLP, an independent "
            "accounting firm based in Minneapolis. The auditor's report on the statements was unqualified. "
            "The firm has audited the company's accounts since 2017, and the partner responsible for the "
            "audit changes every five years.",
            "Dividend. The board has declared a dividend of 42 cents per share for 2024, to be paid to "
            "shareholders on record at the end of April. The company has paid a dividend every year since "
            "1979, including the difficult years of the early 1980s and 2009.",
            "Annual meeting. The annual meeting of shareholders will be held on May 21, 2025 in the "
            "harbor warehouse, beginning at ten in the morning. Shareholders who cannot attend in person "
            "may vote by mail or follow the meeting online. Tours of the laboratory and the repair service "
            "will be offered in the afternoon.",
            "Ethics. Our code of conduct applies to every employee and director, and to our main suppliers. "
            "Concerns can be raised confidentially with the chair of the audit committee. Four concerns were "
            "raised in 2024; all were investigated, and none was found to involve a breach of law.",
            "Contact. Questions about this report may be sent to the company secretary at the headquarters "
            "address. Copies of the full audited financial statements are available to shareholders on "
            "request.",
        ],
    ),
]


class Report(FPDF):
    def footer(self) -> None:
        self.set_y(-15)
        self.set_font("Helvetica", "I", 8)
        self.cell(0, 10, f"{TITLE} - page {self.page_no()}", align="C")


def build(output: Path = OUTPUT) -> Path:
    pdf = Report(format="Letter")
    pdf.set_creation_date(CREATION_DATE)
    pdf.set_producer("kvcli samples/make_samples.py")  # not the fpdf2 version string
    pdf.set_title(TITLE)
    pdf.set_author("Northwind Lantern Co. (fictional; a kvcli sample)")
    pdf.set_margins(22, 20, 22)
    pdf.set_auto_page_break(auto=True, margin=20)
    for index, (heading, paragraphs) in enumerate(PAGES, start=1):
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 15)
        pdf.multi_cell(0, 8, heading, align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)
        pdf.set_font("Helvetica", "", 10.5)
        for paragraph in paragraphs:
            pdf.multi_cell(0, 5.2, paragraph, align="L", new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2.5)
        if pdf.page_no() != index:
            raise SystemExit(f"page {index} ({heading!r}) overflowed onto a second PDF page; shorten it")
    pdf.output(str(output))
    return output


def main() -> int:
    path = build()
    words = sum(len(h.split()) + sum(len(p.split()) for p in ps) for h, ps in PAGES)
    print(f"wrote {path} ({len(PAGES)} pages, {words} words)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
